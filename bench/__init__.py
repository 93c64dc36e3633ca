"""Benchmarks (not tests). Every figure is printed beside the name of the CPU that measured it."""
import platform


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), which every benchmark prints beside its figures."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
