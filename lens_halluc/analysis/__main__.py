"""``python -m lens_halluc.analysis bias|inheritance|drift|confounders|reweighting ...`` (see :mod:`lens_halluc.cli.analysis`)."""
# The CLI is the top layer, which this package may not import; running it by name keeps the
# dependency one-way while `python -m lens_halluc.analysis` keeps working.
import runpy

runpy.run_module("lens_halluc.cli.analysis", run_name="__main__", alter_sys=True)
