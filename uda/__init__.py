"""cs2acdc-uda: Cityscapes→ACDC UDA (MIC/HRDA teacher, FAN student, model soup) as an MLflow project."""

__version__ = "0.1.0"
