"""Output formats, GPU targets and engine builds."""
