"""The OHIF Viewer as a test peer: its npm packages (package.json), a browser script and the Python harness (ohif)."""
