"""Fault injection for the multi-process tests, loaded by the training processes through PYTHONPATH
(`conftest.fault_env`); the engine itself has none.

ACRST_TEST_NAN=STEP:RANK    the loss of step index STEP on RANK becomes NaN (after the loss terms: they stay finite)
ACRST_TEST_RAISE=STEP:RANK  step index STEP on RANK raises RuntimeError("injected failure")
"""
import os


def _at(name):
    value = os.environ.get(name)
    if not value:
        return None
    step, rank = map(int, value.split(":"))
    return step if int(os.environ.get("RANK", 0)) == rank else None


_NAN, _RAISE = _at("ACRST_TEST_NAN"), _at("ACRST_TEST_RAISE")
if _NAN is not None or _RAISE is not None:
    from dataclasses import replace

    from acrst_fast.engine import mean_teacher

    _losses, _run_step = mean_teacher.MeanTeacher.losses, mean_teacher.MeanTeacher.run_step

    def losses(self, step, inputs):
        out = _losses(self, step, inputs)
        return replace(out, total=out.total * float("nan")) if step == _NAN else out

    def run_step(self, step):
        if step == _RAISE:
            raise RuntimeError("injected failure")
        return _run_step(self, step)

    mean_teacher.MeanTeacher.losses, mean_teacher.MeanTeacher.run_step = losses, run_step
