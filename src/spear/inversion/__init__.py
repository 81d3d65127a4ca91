"""Layer inversion as a pipeline of steps (docs/algorithm.md, "The attack step by step").

:class:`~spear.inversion.problem.Problem` is made once from the update (factorisation,
batch size, tolerances, flags); :mod:`~spear.inversion.driver` runs the steps of
:mod:`~spear.inversion.steps` on a :class:`~spear.inversion.state.SearchState`, which
holds the :class:`~spear.inversion.residual.Residual` (the update less the examples
peeled) and, in one :class:`~spear.inversion.pool.DirectionPool`, the found directions.
The steps, in order:

0. ``exhaustive`` (once, small layers): every row subset, then a verified combination.
1. ``peeling``: rows of the residual as candidates; agreeing pairs peeled (fact 8), and
   single rows certified by the model after the layer (fact 12).
2. ``rebase``: the found examples solved again from the original update once peels have
   raised the residual's noise (:mod:`~spear.inversion.rebase`).
3. ``setup``: stop when done; prune the pool; the residual's basis for the round.
4. ``last``: the one missing direction from its example's own ReLU pattern (or Jacobian).
5. ``search``: a registered solver finds the sparse directions the pool lacks.
6. ``tentative``: directions known up to pooled ones, settled by the Jacobians (fact 12).
7. ``subspace``: row candidates on the unknown subspace give missing directions.
8. ``line``: two directions missing: their examples' line, scanned (fact 12).
9. ``focused``: row subsets steered by predicted ReLU patterns (large residuals).
10. ``prune``: drop pooled directions that are combinations of other pooled ones.
11. ``last`` again, then ``solve``: all directions known: solve, verify, peel (facts 5-7).
12. ``input-cone``: vertices of the cone of nonnegative inputs (fact 13), in rounds
    where nothing else progressed.

Steps 1, 2, 4, 6 to 9 and 12 need the layer's weights to guide the search (6, 8 and 12,
and parts of 1 and 4, the model after the layer too); without them (or with
``search_with_weights=False``) the weight-free pipeline runs 0, 3, 5, 10 and the solve, and a
guided search that stalls on a small batch is followed by it. Only verified examples are
returned (:mod:`~spear.inversion.checks`, :mod:`~spear.inversion.result`).
"""
