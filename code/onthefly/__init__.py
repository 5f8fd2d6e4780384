"""On-the-fly modulation (OGM, OGM-GE, OPM) for balanced audio-visual learning."""

__version__ = "0.1.0"
