"""Test harness for the e2e tier: a real control plane on loopback and a "process kubelet" that runs pods."""

from harness.controlplane import ControlPlane, ControlPlaneUnavailable, find_binaries

__all__ = ["ControlPlane", "ControlPlaneUnavailable", "find_binaries"]
