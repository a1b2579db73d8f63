"""Lightning callbacks."""

from framework.callbacks.monitor import ThroughputMonitor

__all__ = ["ThroughputMonitor"]
