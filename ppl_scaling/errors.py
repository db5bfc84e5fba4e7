"""Exceptions raised by the SMC engine and its models."""


class DegenerateWeightsError(RuntimeError):
    """Every particle has weight zero (all log-weights are -inf) at some step.

    The population carries no information any more: the potential rejected every
    particle. Use more particles, a softer potential (temper it, or give a finite
    penalty instead of -inf), or a proposal that respects the constraint.
    """


class PotentialError(ValueError):
    """A potential (``logG``) returned something the engine cannot use: a wrong
    shape, NaN or +inf."""
