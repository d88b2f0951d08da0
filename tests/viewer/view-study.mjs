// Load one study into the OHIF Viewer in headless Chromium, open its SR, and write down what a radiologist sees.
//
//   node view-study.mjs '<json request>'
//
// The request (written by ohif.py's view_study):
//   url          OHIF's /viewer?StudyInstanceUIDs=<uid>
//   outDir       where result.json and the screenshots go
//   srSeriesUid  the SR series to open (null: the first SR display set)
//   ctSeriesUid, ctSopUid  optional: show that CT slice (default: the middle one) before the SR and screenshot it
//   jumpToRow    optional: after opening the SR, click that row of the measurements panel (OHIF then shows the
//                measurement's slice; needed for SCOORD3D findings, which OHIF does not scroll to by itself)
//   chromium     the browser binary (never downloaded); timeoutMs: bound of the whole run
//
// result.json:
//   consoleErrors       console.error messages (with the bundle file and line)
//   pageErrors          uncaught exceptions and unhandled promise rejections (message and first stack frame)
//   consoleWarnings     console.warn messages (OHIF reports SR content it skips there)
//   failedRequests      requests that failed or got HTTP >= 400 (aborted prefetches are left out)
//   measurementRows     the texts of the measurements panel's rows ("1 <label> <values...>")
//   sr                  the SR display set as OHIF holds it: isLoaded, isRehydratable, isHydrated, its measurements
//   measurements        the measurement service's measurements (label, toolName, referenced SOP instance)
//   annotations         cornerstone annotations (toolName, label, referenced image)
//   viewport            the active viewport: display sets, image, canvas (none: a black/empty viewport), its box
//   srOpened, prompts   whether the SR thumbnail was opened; the prompts answered with yes
//   screenshots         name -> file in outDir: ct (before the SR, if asked), viewport and page (after)
//   viewportBox         the active viewport's box in page.png (CSS pixels = screenshot pixels)
//   steps, elapsedMs    what happened when (ms since start); error: why the run stopped early (or null)
//
// Every wait is on a condition (OHIF's services, selectors) and bounded; the exit status is 0 when result.json
// describes a finished run, whatever the viewer showed.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const request = JSON.parse(process.argv[2]);
const started = Date.now();
const timeoutMs = request.timeoutMs || 90000;
const deadline = started + timeoutMs;
const out = request.outDir;
const result = {
  request,
  consoleErrors: [],
  pageErrors: [],
  consoleWarnings: [],
  failedRequests: [],
  measurementRows: [],
  sr: null,
  measurements: [],
  annotations: [],
  viewport: null,
  srOpened: false,
  prompts: [],
  screenshots: {},
  viewportBox: null,
  steps: [],
  error: null,
};

const step = (what) => {
  result.steps.push({ at: Date.now() - started, what });
  if (process.env.VIEW_STUDY_DEBUG) console.error(`[${Date.now() - started} ms] ${what}`);
};
const left = () => Math.max(1000, deadline - Date.now());
const upTo = (ms) => Math.min(ms, left());
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A clean profile; no network but loopback (this machine refuses outside connections, and Chromium's background
// requests then slow it down); no GPU: WebGL runs on SwiftShader, which Chromium only allows when asked to.
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'ohif-chromium-'));
const browser = await puppeteer.launch({
  executablePath: request.chromium || '/usr/bin/chromium',
  headless: true,
  userDataDir: profile,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--enable-unsafe-swiftshader',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-default-apps',
    '--disable-extensions',
    '--window-size=1280,800',
  ],
  defaultViewport: { width: 1280, height: 800 },
  protocolTimeout: timeoutMs,
});

async function main() {
  const page = await browser.newPage();
  page.setDefaultTimeout(left());
  await listen(page);

  step(`open ${request.url}`);
  await page.goto(request.url, { waitUntil: 'domcontentloaded', timeout: left() });
  // The study is there when OHIF has its display sets and each has its thumbnail in the study browser.
  await page.waitForFunction(
    () => {
      const sets = window.services?.displaySetService?.getActiveDisplaySets() || [];
      return sets.length > 0 && sets.every((ds) => document.getElementById(`thumbnail-${ds.displaySetInstanceUID}`));
    },
    { timeout: left(), polling: 100 },
  );
  step('display sets and thumbnails are there');
  await waitForImage(page, 20000).then(
    () => step('the first viewport shows an image'),
    () => step('no image in the first viewport'),
  );

  if (request.ctSeriesUid) {
    await showCtSlice(page, request.ctSeriesUid, request.ctSopUid);
    result.screenshots.ct = await viewportShot(page, 'ct.png');
    step('CT slice screenshot');
  }

  const sr = await page.evaluate((seriesUid) => {
    const sets = window.services.displaySetService.getActiveDisplaySets();
    const found = sets.find((ds) => ds.Modality === 'SR' && (!seriesUid || ds.SeriesInstanceUID === seriesUid));
    return found?.displaySetInstanceUID ?? null;
  }, request.srSeriesUid);
  if (sr) {
    await openSr(page, sr);
    if (Number.isInteger(request.jumpToRow)) await clickRow(page, request.jumpToRow);
  } else {
    result.error = `no SR display set${request.srSeriesUid ? ` of series ${request.srSeriesUid}` : ''} in the study`;
  }

  result.measurementRows = await page.$$eval('[data-cy^="measurement-table-row-"]', (rows) =>
    rows.map((row) => row.innerText.replace(/\s+/g, ' ').trim()),
  );
  result.sr = sr ? await srState(page, sr) : null;
  result.measurements = await page.evaluate(() =>
    window.services.measurementService.getMeasurements().map((m) => ({
      uid: m.uid,
      label: m.label,
      toolName: m.toolName,
      referenceSeriesUID: m.referenceSeriesUID,
      SOPInstanceUID: m.SOPInstanceUID,
      frameNumber: m.frameNumber,
      displayText: m.displayText,
    })),
  );
  result.annotations = await page.evaluate(() =>
    (window.cornerstoneTools?.annotation.state.getAllAnnotations() || []).map((a) => ({
      toolName: a.metadata?.toolName,
      label: a.data?.label,
      referencedImageId: a.metadata?.referencedImageId,
      points: a.data?.handles?.points?.length,
    })),
  );
  result.viewport = await viewportState(page);
  result.screenshots.viewport = await viewportShot(page, 'viewport.png');
  await page.screenshot({ path: path.join(out, 'page.png') });
  result.screenshots.page = 'page.png';
  step('screenshots');
}

async function listen(page) {
  page.on('console', (message) => {
    const type = message.type();
    if (type === 'error') {
      const where = message.location();
      const text = message.text();
      result.consoleErrors.push(where?.url ? `${text} (${path.basename(where.url)}:${where.lineNumber})` : text);
    } else if (type === 'warn' || type === 'warning') {
      result.consoleWarnings.push(message.text().slice(0, 500));
    }
  });
  // OHIF's bundle replaces Promise (core-js), and Chromium does not report that Promise's unhandled rejections as
  // page errors (nor in the console): the page hands them over from an 'unhandledrejection' listener.
  const pageError = (message, stack) => {
    const frame = (stack || '').split('\n').find((line) => line.trim().startsWith('at ')) || '';
    if (!result.pageErrors.some((known) => known.includes(message))) {
      result.pageErrors.push(`${message}${frame ? ` ${frame.trim()}` : ''}`);
    }
  };
  page.on('pageerror', (error) => pageError(error.message, error.stack));
  await page.exposeFunction('__viewStudyRejection', (message, stack) =>
    pageError(`Unhandled promise rejection: ${message}`, stack),
  );
  page.on('requestfailed', (req) => {
    const reason = req.failure()?.errorText || 'failed';
    if (reason !== 'net::ERR_ABORTED') result.failedRequests.push(`${reason} ${req.url()}`);
  });
  page.on('response', (response) => {
    if (response.status() >= 400) result.failedRequests.push(`${response.status()} ${response.url()}`);
  });
  await page.evaluateOnNewDocument(() => {
    localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); // no onboarding tour over the viewport
    window.addEventListener('unhandledrejection', (event) => {
      const reason = event.reason;
      window.__viewStudyRejection(String(reason?.message ?? reason), String(reason?.stack ?? ''));
    });
  });
}

// Until a viewport has an image drawn (cornerstone holds its image data).
async function waitForImage(page, timeout) {
  await page.waitForFunction(
    () => {
      const viewports = window.cornerstone?.getRenderingEngines?.()[0]?.getViewports?.() || [];
      return viewports.some((vp) => vp.getCurrentImageId?.() && vp.getImageData?.());
    },
    { timeout: upTo(timeout), polling: 100 },
  );
}

// Two animation frames and a little more: the last render and the SVG annotation layer are on screen.
async function settle(page) {
  await page.evaluate(
    () => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(resolve, 100)))),
  );
}

async function doubleClickThumbnail(page, displaySetUid) {
  const selector = `[id="thumbnail-${displaySetUid}"]`;
  await page.waitForSelector(selector, { visible: true, timeout: upTo(10000) });
  await page.$eval(selector, (element) => element.scrollIntoView({ block: 'center' }));
  await page.click(selector, { count: 2, delay: 50 });
}

// Show ctSopUid (default: the middle slice) of the CT series in the active viewport, as scrolling there would.
async function showCtSlice(page, seriesUid, sopUid) {
  const uid = await page.evaluate((seriesUid) => {
    const sets = window.services.displaySetService.getActiveDisplaySets();
    return sets.find((ds) => ds.SeriesInstanceUID === seriesUid && ds.Modality !== 'SR')?.displaySetInstanceUID;
  }, seriesUid);
  if (!uid) throw new Error(`no display set of the CT series ${seriesUid}`);
  const shown = await page.evaluate((uid) => {
    const grid = window.services.viewportGridService;
    return grid.getDisplaySetsUIDsForViewport(grid.getActiveViewportId())?.includes(uid);
  }, uid);
  if (!shown) await doubleClickThumbnail(page, uid);
  await waitForImage(page, 20000);
  await page.waitForFunction(
    async (sopUid) => {
      const grid = window.services.viewportGridService;
      const viewport = window.cornerstone.getRenderingEngines()[0].getViewport(grid.getActiveViewportId());
      const ids = viewport?.getImageIds?.() || [];
      if (!ids.length) return false;
      let index = sopUid ? ids.findIndex((id) => id.includes(`/instances/${sopUid}/`)) : -1;
      if (index < 0) index = Math.floor(ids.length / 2);
      if (viewport.getCurrentImageIdIndex() !== index) {
        await viewport.setImageIdIndex(index);
        return false;
      }
      return !!viewport.getImageData();
    },
    { timeout: upTo(20000), polling: 200 },
    sopUid || null,
  );
  await settle(page);
}

// Double-click the SR's thumbnail, answer OHIF's prompts ("continue tracking measurements?") with yes, and wait
// until OHIF is done with it: hydrated into measurements, loaded but not rehydratable (shown as an SR view), failed
// (a page error), or loaded with nothing changing any more (e.g. no image to put its measurements on).
async function openSr(page, displaySetUid) {
  await doubleClickThumbnail(page, displaySetUid);
  result.srOpened = true;
  step('double-clicked the SR thumbnail');

  const until = Date.now() + upTo(30000);
  let last = null;
  let lastChange = Date.now();
  while (Date.now() < until) {
    for (const button of await page.$$('xpath/.//button[normalize-space(.)="Yes"]')) {
      if (!(await button.isVisible())) continue;
      const prompt = await button.evaluate((b) => {
        let box = b;
        for (let i = 0; i < 4 && box.parentElement; i += 1) box = box.parentElement;
        return box.innerText.replace(/\s+/g, ' ').trim().slice(0, 300);
      });
      await button.click();
      result.prompts.push(prompt);
      step(`answered "${prompt}" with yes`);
    }
    const state = await srState(page, displaySetUid);
    if (state?.isHydrated) {
      step('SR hydrated');
      break;
    }
    if (state?.isLoaded && (state.isRehydratable === false || result.pageErrors.length)) {
      step(`SR loaded, rehydratable: ${state.isRehydratable}, page errors: ${result.pageErrors.length}`);
      break;
    }
    const snapshot = JSON.stringify(state);
    if (snapshot !== last) {
      last = snapshot;
      lastChange = Date.now();
    } else if (state?.isLoaded && Date.now() - lastChange > 4000) {
      step('SR loaded, not hydrated, and nothing changes');
      break;
    }
    await sleep(150);
  }

  // The rows of the measurements panel (it opens by itself on hydration; else open its tab).
  const expected = await page.evaluate(() => window.services.measurementService.getMeasurements().length);
  if (expected > 0) {
    const tab = await page.$('[data-cy="trackedMeasurements-btn"], [data-cy="measurements-btn"]');
    if (!(await page.$('[data-cy="trackedMeasurements-panel"]')) && tab) await tab.click();
    await page
      .waitForFunction(
        (n) => document.querySelectorAll('[data-cy^="measurement-table-row-"]').length >= n,
        { timeout: upTo(10000), polling: 100 },
        expected,
      )
      .catch(() => step('not every measurement got a row in the panel'));
  }
  await waitForImage(page, 5000).catch(() => step('no image in any viewport'));
  // Annotations are drawn as SVG over the canvas of the viewport that shows their image.
  await page
    .waitForFunction(
      () => {
        const id = window.services.viewportGridService.getActiveViewportId();
        const element = document.querySelector(`[data-viewportid="${id}"]`);
        const annotations = window.cornerstoneTools?.annotation.state.getAllAnnotations() || [];
        const drawable = annotations.filter((a) => a.metadata?.toolName !== 'ReferenceLines');
        return !drawable.length || element?.querySelector('svg g[data-annotation-uid], svg [data-id]');
      },
      { timeout: upTo(5000), polling: 100 },
    )
    .catch(() => step('no annotation drawn in the active viewport'));
  await settle(page);
}

async function clickRow(page, index) {
  const row = await page.$(`[data-cy="measurement-table-row-${index}"]`);
  if (!row) {
    step(`no measurement row ${index} to click`);
    return;
  }
  await row.click();
  step(`clicked measurement row ${index}`);
  await sleep(300);
  await waitForImage(page, 5000).catch(() => step('no image after the jump'));
  await settle(page);
}

async function srState(page, displaySetUid) {
  return page.evaluate((uid) => {
    const ds = window.services.displaySetService.getDisplaySetByUID(uid);
    if (!ds) return null;
    return {
      displaySetInstanceUID: uid,
      SeriesInstanceUID: ds.SeriesInstanceUID,
      SOPClassUID: ds.SOPClassUID,
      isImagingMeasurementReport: ds.isImagingMeasurementReport,
      isLoaded: ds.isLoaded,
      isRehydratable: ds.isRehydratable,
      isHydrated: ds.isHydrated,
      measurements: (ds.measurements || []).map((m) => ({
        TrackingIdentifier: m.TrackingIdentifier,
        loaded: m.loaded,
        valueType: m.coords?.[0]?.ValueType,
        graphicType: m.coords?.[0]?.GraphicType,
        coords: m.coords?.length || 0,
        labels: (m.labels || []).map((l) => `${l.label}: ${l.value}`),
        ReferencedSOPInstanceUID: m.ReferencedSOPInstanceUID,
        frameNumber: m.frameNumber,
      })),
    };
  }, displaySetUid);
}

async function viewportState(page) {
  return page.evaluate(() => {
    const id = window.services.viewportGridService.getActiveViewportId();
    const element = document.querySelector(`[data-viewportid="${id}"]`);
    const canvas = element?.querySelector('canvas');
    const box = canvas?.getBoundingClientRect();
    const viewport = window.cornerstone.getRenderingEngines()[0]?.getViewport(id);
    return {
      viewportId: id,
      displaySetInstanceUIDs: window.services.viewportGridService.getDisplaySetsUIDsForViewport(id) || [],
      hasCanvas: !!canvas,
      canvasBox: box ? { x: box.x, y: box.y, width: box.width, height: box.height } : null,
      imageId: viewport?.getCurrentImageId?.() || null,
      svgShapes: element ? element.querySelectorAll('svg path, svg ellipse, svg circle, svg line, svg polyline').length : 0,
    };
  });
}

async function activeViewportElement(page) {
  return page.evaluateHandle(() => {
    const id = window.services.viewportGridService.getActiveViewportId();
    const element = document.querySelector(`[data-viewportid="${id}"]`);
    return element?.closest('[data-cy="viewport-pane"]') || element || document.querySelector('[data-cy="viewport-pane"]');
  });
}

async function viewportShot(page, name) {
  const element = (await activeViewportElement(page)).asElement();
  if (!element) return null;
  result.viewportBox = await element.boundingBox();
  await element.screenshot({ path: path.join(out, name) });
  return name;
}

let exitCode = 0;
try {
  await Promise.race([
    main(),
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms`)), left())),
  ]);
} catch (error) {
  result.error = String(error?.stack || error);
  exitCode = 1;
}
result.elapsedMs = Date.now() - started;
fs.writeFileSync(path.join(out, 'result.json'), JSON.stringify(result, null, 2));
await browser.close().catch(() => {});
fs.rmSync(profile, { recursive: true, force: true });
process.exit(exitCode);
