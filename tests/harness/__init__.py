"""Test harness for the e2e tier: a real control plane on loopback and a "process kubelet" that runs pods.

Import as ``harness`` (tests/ is on sys.path under pytest): ``from harness import ControlPlane, ProcessKubelet``.
"""

from harness.controlplane import ControlPlane, ControlPlaneUnavailable, find_binaries
from harness.process_kubelet import ProcessKubelet
from harness.report import pipeline_report
from harness.rest import ApiError, KubeREST
from harness.wait import wait_for

__all__ = ["ApiError", "ControlPlane", "ControlPlaneUnavailable", "KubeREST", "ProcessKubelet", "find_binaries", "pipeline_report",
           "wait_for"]
