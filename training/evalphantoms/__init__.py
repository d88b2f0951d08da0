"""CTPA phantoms of a second, independent construction, for evaluation only: never trained on, never used to select.

The training family (``training.phantoms``) builds its chest from ellipsoids and straight capsules grown by a branching
rule, draws its clots as coverage of those capsules, and renders each slice as one plane. This family shares none of
that: the body, lungs and heart are superellipse sections (``shapes``, ``patient``), the vessel and airway trees grow
by space colonisation with pipe-model radii (``tree``), vessels are tapered tubes whose partial volume is sampled
across each pixel and through the slice's thickness, and a clot is an off-centre ellipse defined in its artery's own
frame along a stretch of its centreline (``clot``). The studies (``study``) follow a written description of an
independent CTPA design: 512 x 512, 0.6-0.8 mm pixels, 1-2 mm slices, trunk and lobar arteries at 260-420 HU, noise of
10-22 HU, clots of 45-80 % of the artery's radius over 12-40 mm in the pulmonary trunk or a lobar artery, half the
studies positive, every positive study's clot location recorded (``clots.csv``).

It shares with the training family only what any scanner's files share: the RSPECT table writer
(``training.rspect``) and the CT Image Storage encoder (``training.phantoms.ctimage``).
``pe-train phantoms --family independent`` writes a set.
"""
