"""Package marker so the metric script ships with the kit; load it with evaluate.load(<this folder>)."""
