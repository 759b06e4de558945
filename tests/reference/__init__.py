"""Independent reference implementations that tests compare the project's code against. They
share no code with the modules they check:

- gits_main_reference: the official gits-main samplers and search (zju-pi/diff-sampler), written
  from its formulas, for compat='gits-main' (tests/test_compat.py, tests/test_compat_search.py);
- solver_reference: high-precision (mpmath) solver coefficients by direct quadrature and the
  UniPC paper's linear system, and float64 step-by-step DPM-Solver++ and UniPC written from their
  papers (tests/test_solvers.py).
"""
