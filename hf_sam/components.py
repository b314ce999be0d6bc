"""The literal registries of the pieces a method is made of, and how resolved arguments pick them."""

from __future__ import annotations

from .ascent import AdaptiveAscent, AscentRule, UnnormalizedAscent
from .descent import DescentPipeline, DescentTransform
from .fsam import FriendlyAscent
from .gsam import SurrogateGap
from .looksam import LookSAMReuse
from .loss_term import LossTerm
from .mesa import MESATerm
from .saf import SAFTerm
from .stable_sam import Renormalize


ASCENT_RULES: dict[str, type[AscentRule]] = {
    "sam": AscentRule,
    "adaptive": AdaptiveAscent,
    "unnormalized": UnnormalizedAscent,
    "fsam": FriendlyAscent,
}

DESCENT_TRANSFORMS: dict[str, type[DescentTransform]] = {
    "gsam": SurrogateGap,
    "looksam": LookSAMReuse,
}


LOSS_TERMS: dict[str, type[LossTerm]] = {
    "saf": SAFTerm,
    "mesa": MESATerm,
}


LOSS_TERM_CHOICES = ("none", *LOSS_TERMS)


def build_ascent(args) -> AscentRule:
    return ASCENT_RULES[args.sam_ascent](args)


def build_descent(args) -> DescentPipeline:
    """The method's own transform (GSAM, LookSAM) first, then Stable SAM's renormalization if asked."""
    transforms = []
    if args.sam_descent != "none":
        transforms.append(DESCENT_TRANSFORMS[args.sam_descent](args))
    if args.sam_renormalize:
        transforms.append(Renormalize(args))
    return DescentPipeline(transforms, args)
