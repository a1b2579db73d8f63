"""Lightning callbacks."""

from memfit.callbacks.monitor import ThroughputMonitor

__all__ = ["ThroughputMonitor"]
