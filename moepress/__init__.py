"""moepress: prune, quantize, export and build Mixture-of-Experts LLMs, one decoder layer at a time.

Package map (import name -> folder in the repository):
  moepress            -> pipeline/   CLI, recipes, run/resume, manifests, publishing
  moepress.compress   -> compress/   checkpoint I/O, architecture adapters, layer stream, pruning, quantization
  moepress.calib      -> calib/      calibration data, observers, routing statistics, accuracy checks
  moepress.exporters  -> exporters/  output formats, GPU targets, engine builds
  moepress.models     -> models/     the bundled tiny test models
"""

__version__ = "0.1.0"
