"""Measure model_foundry without tracing the loading of every other module: the suite runs faster under coverage.

On Python 3.11 coverage traces with `sys.settrace`, and while a trace function is set CPython runs *all* Python code
on its slow tracing path, whether coverage measures that file or not. Every `foundry` subprocess of the test suite
spends seconds importing torch, transformers, pydantic and the rest; traced, that takes ~30-40% longer. Here, in a
process that coverage measures, the first import of a module outside model_foundry runs with this thread's tracer
off, and the tracer is put back once the module is loaded (an import of model_foundry nested inside it is traced).
Only loading is affected: the functions of every module, torch's included, are traced when called later, as before.
What is lost: a model_foundry function called by another package's module-level code while that package is being
imported (none is). The lines recorded for `import model_foundry.cli, model_foundry.corpus` and a CLI call are the
same with and without this.

`make test` writes a .pth file into the virtual environment that runs `install()` at start-up, after coverage's own
.pth (`a1_coverage.pth`) started coverage; in a process that coverage does not measure, it does nothing.
"""
import sys, threading

PACKAGE = 'model_foundry'


def _coverage_tracer(t) -> bool: return type(t).__name__ == 'CTracer'  # coverage's C tracer, not a debugger's


def install(package: str = PACKAGE):
    "Wrap importlib's `_find_and_load`, which runs once per module, on its first import."
    import importlib._bootstrap as bootstrap
    if getattr(bootstrap._find_and_load, '_coverage_imports', False): return
    find_and_load, paused = bootstrap._find_and_load, threading.local()  # paused.tracer: the tracer a paused import took off

    def _find_and_load(name, import_):
        tracer = sys.gettrace()
        if name == package or name.startswith(package + '.'):
            saved = getattr(paused, 'tracer', None)
            if tracer is not None or saved is None: return find_and_load(name, import_)
            sys.settrace(saved)  # ours, imported inside a paused import: traced
            try: return find_and_load(name, import_)
            finally: sys.settrace(None)
        if not _coverage_tracer(tracer): return find_and_load(name, import_)  # not traced, or already paused
        outer, paused.tracer = getattr(paused, 'tracer', None), tracer
        sys.settrace(None)
        try: return find_and_load(name, import_)
        finally:
            sys.settrace(tracer)  # coverage's CTracer takes being put back this way (it supports settrace(gettrace()))
            paused.tracer = outer

    _find_and_load._coverage_imports = True
    bootstrap._find_and_load = _find_and_load


def pth_line(path: str) -> str:
    "The .pth line that runs `install()` from this file at start-up where coverage was started; silent when it cannot."
    code = ("import os, importlib.util as u\n"
            "if os.environ.get('COVERAGE_PROCESS_START') or os.environ.get('COVERAGE_PROCESS_CONFIG'):\n"
            " try:\n"
            f"  s = u.spec_from_file_location('_model_foundry_coverage_imports', {path!r}); m = u.module_from_spec(s)\n"
            "  s.loader.exec_module(m); m.install()\n"
            " except Exception: pass\n")
    return f'import sys; exec({code!r})\n'


if __name__ == '__main__':  # `make test`: write the .pth into this interpreter's site-packages (the virtual environment's)
    import pathlib, sysconfig
    pth = pathlib.Path(sysconfig.get_paths()['purelib'])/'a2_model_foundry_coverage_imports.pth'
    line = pth_line(str(pathlib.Path(__file__).resolve()))
    if not pth.is_file() or pth.read_text() != line: pth.write_text(line)
