"""ViSP's "castel" sequence (Debian's `visp-images-data`, GPL-2, installed by `make test`):
30 frames of a painted model castle moved by hand before a fixed Intel RealSense (the
box, the pens and the window behind it stand still), with a depth frame registered to
each."""

from pathlib import Path

CASTEL = Path("/usr/share/visp-images-data/ViSP-images/mbt-depth/castel")
STEP = 2  # the jobs take every second frame of the 30: 15 photos, wider baselines
# The castle lies 0.21-0.31 m from the sensor; the box behind it, at 0.35-0.47 m, and the
# room stand still while the castle moves, so the job leaves them out of its model.
CASTLE_MAX_DEPTH_M = 0.33
