"""Scripts behind the tutorial scenarios: sweeps that run a scenario several times and draw one figure."""
