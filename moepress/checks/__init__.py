"""Accuracy checks that gate CI: a candidate against its reference checkpoint (``moepress check``).

- :mod:`.config`: :class:`CheckConfig` (thresholds, data) and the gates;
- :mod:`.candidates`: the registry of candidate kinds (checkpoint, transformers, onnx, engine);
- :mod:`.runner`: :func:`run_check`, the reference streamed beside the candidate;
- :mod:`.report`: report.json / report.md / layer_error.png, and the manifest's accuracy section;
- :mod:`.seal`: the HMAC seal of that section (a per-user key);
- :mod:`.verify`: what publishing recomputes of a recorded section.
"""

from moepress.checks.candidates import CANDIDATE_KINDS, Candidate, Outputs, register_candidate
from moepress.checks.candidates.hf_transformers import misloaded
from moepress.checks.config import GATES, CheckConfig, parse_fraction
from moepress.checks.report import check_report_dir, jsonable, prepare_record, record_in_manifest, write_report
from moepress.checks.runner import run_check
from moepress.checks.verify import Verdict, verify_section

__all__ = ["CANDIDATE_KINDS", "GATES", "Candidate", "CheckConfig", "Outputs", "Verdict", "jsonable", "misloaded",
           "parse_fraction", "prepare_record", "record_in_manifest", "register_candidate", "run_check",
           "verify_section", "write_report", "check_report_dir"]
