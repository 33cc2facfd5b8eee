"""Privacy accounting, shared by the DP defenses and the reports.

* :mod:`fedsim.privacy.accounting`: epsilon of a history of subsampled Gaussian steps, from Opacus's
  accountants and, independently, from Google's ``dp_accounting`` (RDP and PLD).
* :mod:`fedsim.privacy.summary`: the run's privacy block (per-client cumulative epsilon over the
  whole run, its distribution, central DP's epsilon) and the flat fields every summary reports.

Pure functions with no plug-in imports: ``defenses/`` import this package, never the other way.
"""
