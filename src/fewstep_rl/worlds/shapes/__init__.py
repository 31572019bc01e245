"""The ``shapes`` world: small compositional scenes ("two red circles", "a blue square left of a green triangle").

Model-free parts: :mod:`.grammar` (prompt language, train / held-out split, GenEval-like metadata), :mod:`.render`
(procedural ground-truth renderer) and :mod:`.verify` (the exact, non-differentiable gold verifier).
"""
