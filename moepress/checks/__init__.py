"""Accuracy checks that gate CI: a candidate against its reference checkpoint (``moepress check``).

- :mod:`.config`: :class:`CheckConfig` (thresholds, data) and the gates;
- :mod:`.candidates`: the registry of candidate kinds (checkpoint, transformers, onnx, engine);
- :mod:`.runner`: :func:`run_check`, the reference streamed beside the candidate;
- :mod:`.report`: report.json / report.md / layer_error.png, and the manifest's accuracy section.
"""

from moepress.checks.candidates import CANDIDATE_KINDS, Candidate, Outputs, register_candidate
from moepress.checks.config import GATES, CheckConfig, parse_fraction
from moepress.checks.report import jsonable, record_in_manifest, write_report
from moepress.checks.runner import run_check

__all__ = ["CANDIDATE_KINDS", "GATES", "Candidate", "CheckConfig", "Outputs", "jsonable", "parse_fraction",
           "record_in_manifest", "register_candidate", "run_check", "write_report"]
