"""The warm-start ray: the next scale along a ratio vector's ray toward the tax budget.

A merge's reward usually peaks at the budget, and along a ray (ratios x scale, scale 0 being
the base model at tax 0) the tax rises with the scale. :func:`next_scale` turns the points
measured on a ray into the next scale to try: the secant through the highest feasible point
(or the base) and the lowest infeasible one above it, held a tenth of the bracket inside
it; without an infeasible point, extrapolated from the next feasible point down, up to the
ratio bounds. :class:`WarmStart` enqueues a job's warm-start vectors and the ray's points
into its study; the search (workers/search.py) calls it at set-up and before each ask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from optuna.trial import TrialState

from service.errors import SpecError

log = logging.getLogger(__name__)

#: a vector within this (per slot) of scale x the ray lies on the ray
RAY_TOLERANCE = 1e-4
#: stop refining once a feasible scale's tax is within this share of the budget, or the
#: feasible and infeasible scales (or the next step) are this close
RAY_CLOSE = 0.005


def scale_on(ray: Sequence[float], vector: Sequence[float]) -> float | None:
    """The scale s with ``vector`` = s x ``ray`` (within RAY_TOLERANCE per slot), else None."""
    norm = sum(v * v for v in ray)
    if norm == 0:
        return None
    scale = sum(v * w for v, w in zip(ray, vector)) / norm
    if all(abs(w - scale * v) <= RAY_TOLERANCE for v, w in zip(ray, vector)):
        return scale
    return None


def usable_ray(vector: Sequence[float], low: float, high: float) -> bool:
    """Whether a ray's points stay unclipped: it runs from the base model (scale 0), so the
    ratio bounds must admit 0, and the vector must lie inside them."""
    return low <= 0 and all(0 <= v <= high for v in vector)


def next_scale(ray: Sequence[float], measured: Iterable[tuple[float, float]], *,
               budget: float, high: float) -> float | None:
    """The next scale to measure on ``ray`` from its ``measured`` (scale, tax) points, or
    None when refining is done (close enough to the budget, or the step would be under
    ``RAY_CLOSE``). ``high`` is the upper ratio bound, which caps the scale."""
    points = sorted(set(measured) | {(0.0, 0.0)})
    feasible = [p for p in points if p[1] <= budget]
    over = [p for p in points if p[1] > budget]
    lo = max(feasible)
    if budget - lo[1] <= RAY_CLOSE * budget:
        return None
    cap = min(high / v for v in ray if v > 0)
    hi = min((p for p in over if p[0] > lo[0]), default=None)  # uneven tax: above lo only
    if hi is not None:
        if hi[0] - lo[0] <= RAY_CLOSE:
            return None
        scale = lo[0] + (budget - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
        margin = 0.1 * (hi[0] - lo[0])  # stay inside the bracket
        return min(max(scale, lo[0] + margin), hi[0] - margin)
    below = feasible[-2]  # the next feasible scale down (at least the base)
    rise, run = lo[1] - below[1], lo[0] - below[0]
    if rise > 0 and run > 0:
        scale = min(cap, lo[0] + (budget - lo[1]) * run / rise)
    elif lo[1] > 0:  # uneven tax: the slope from the base (scale 0, tax 0) instead
        scale = min(cap, budget * lo[0] / lo[1])
    else:
        scale = cap
    if scale - lo[0] <= RAY_CLOSE:
        return None
    return scale


class WarmStart:
    """Ratio vectors run as they are, then steps along the first one's ray to the budget, in
    a job's study: the spec's ``search.warm_start`` (kind 'warm', ``warm_start_refine``
    steps), or the gradient stage's result (kind 'gradient').

    Points on the ray carry ``ray_scale`` and ``ray`` (the kind: rays of different kinds in
    one study are apart; a point without ``ray`` is a warm one, as studies before kept
    them); the steps also ``refine``.
    """

    def __init__(self, search, vectors: list[list[float]] | None = None, *,
                 refine: int | None = None, kind: str = "warm") -> None:
        self.search = search
        self.study = search.study
        self.kind = kind
        s = search.spec.search
        if vectors is None:
            vectors = [[float(v[slot]) for slot in search.slots]
                       for v in self._checked(s.warm_start or [], search.slots)]
        self.vectors = vectors
        self.refine_limit = s.warm_start_refine if refine is None else refine
        self.budget = search.spec.tax.budget
        self.low, self.high = search.space.low, search.space.high
        ray = self.vectors[0] if self.vectors and self.refine_limit else None
        usable = ray is not None and search.spec.mean_ratio is None and \
            usable_ray(ray, self.low, self.high)
        self.ray = ray if usable else None
        self._done = False

    @staticmethod
    def _checked(warm: list[dict], slots: list[str]) -> list[dict]:
        for ratios in warm:
            if set(ratios) != set(slots):
                raise SpecError(f"search.warm_start names slots {sorted(ratios)}, but this "
                                f"job's grouping has {slots}", field="search.warm_start")
        return warm

    def clipped(self, vector: Sequence[float]) -> dict[str, float]:
        """The trial params of ``vector``, clipped to the ratio bounds."""
        return dict(zip(self.search.space.param_names(),
                        [min(max(v, self.low), self.high) for v in vector]))

    def enqueue(self, taken: Callable[[str], list]) -> None:
        """Enqueue the vectors not yet taken, after the uniform baseline."""
        done = [t.user_attrs.get("warm_start") for t in taken(self.kind)
                if not t.user_attrs.get("refine")]
        for vector in self.vectors:
            if vector in done:
                done.remove(vector)
                continue
            attrs = {"kind": self.kind, "warm_start": vector}
            scale = scale_on(self.ray, vector) if self.ray else None
            if scale is not None and all(self.low <= v <= self.high for v in vector):
                attrs.update(ray_scale=scale, ray=self.kind)  # on the ray, not clipped off
            self.study.enqueue_trial(self.clipped(vector), user_attrs=attrs)

    def on_ray(self) -> list:
        """This ray's points that count: not failed, and RUNNING only where other workers may
        run them (the service); a CLI study resumed after a crash has them stale."""
        live = self.search.live_running
        return [t for t in self.study.get_trials(deepcopy=False)
                if t.user_attrs.get("ray_scale") is not None
                and t.user_attrs.get("ray", "warm") == self.kind and t.state != TrialState.FAIL
                and (live or t.state != TrialState.RUNNING)]

    @property
    def done(self) -> bool:
        return self.ray is None or self._done

    def refine(self) -> float | None:
        """Enqueue the next point on the ray when one is due (:func:`next_scale`): one point
        at a time, after every point on the ray has finished, at most ``refine_limit``.
        Returns the scale enqueued."""
        ray = self.ray
        if self._done or ray is None or not any(v > 0 for v in ray):
            return None
        on_ray = self.on_ray()
        scale = step_on(on_ray, ray, self.refine_limit, self.budget, self.high)
        if scale is None:  # for good: this process stops looking (it reads every trial)
            self._done = True
            return None
        if scale is PENDING:
            return None
        vector = [v * scale for v in ray]
        self.study.enqueue_trial(self.clipped(vector), user_attrs={
            "kind": self.kind, "warm_start": vector, "ray_scale": scale, "ray": self.kind,
            "refine": True})
        log.info("search %s: %s ray refined at scale %.4f", self.search.name, self.kind, scale)
        return scale


def tax_of(trial) -> float:
    """The tax a ray aims at the budget with: its upper bound under ``tax.confidence``
    (feasibility's own rule), else the tax."""
    return trial.user_attrs.get("tax_bound", trial.user_attrs["tax"])


#: :func:`step_on`'s answer while a point on the ray is still under way
PENDING = -1.0
#: most points the bisection baseline measures
BISECTION_POINTS = 6


def step_on(on_ray: list, ray: Sequence[float], limit: int, budget: float,
            high: float) -> float | None:
    """The next scale on a ray from its trials (``ray_scale`` and ``tax`` attributes):
    PENDING while one is waiting or running, None when done (``limit`` steps taken, no
    measured point, or :func:`next_scale` says so)."""
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in on_ray):
        return PENDING
    refined = sum(bool(t.user_attrs.get("refine")) for t in on_ray)
    measured = {(t.user_attrs["ray_scale"], tax_of(t)) for t in on_ray
                if "tax" in t.user_attrs}
    if refined >= limit or not measured:  # no measured point: they failed
        return None
    return next_scale(ray, measured, budget=budget, high=high)


class Bisection:
    """The uniform baseline without a grid: vanilla averaging's tax rises with α, so the
    largest feasible α is found by secant steps on the budget (:func:`next_scale` on the
    all-ones ray, θ_base being α 0 at tax 0): α = the upper bound first, then bracketed
    secants (the bracket halved after two steps from one side: a curved tax), to within
    0.5 % of the budget or a step under 0.005, at most ``limit`` points.
    When no α above 0 is feasible, α 0 itself is measured (a feasible baseline)."""

    def __init__(self, search, limit: int = BISECTION_POINTS) -> None:
        self.search = search
        self.study = search.study
        self.limit = limit
        self.high = search.space.high
        self.budget = search.spec.tax.budget
        self._done = False

    def points(self) -> list:
        live = self.search.live_running
        return [t for t in self.study.get_trials(deepcopy=False)
                if t.user_attrs.get("kind") == "uniform" and t.state != TrialState.FAIL
                and (live or t.state != TrialState.RUNNING)]

    def _add_point(self, alpha: float) -> None:
        self.study.enqueue_trial(self.search.space.uniform_params(alpha), user_attrs={
            "kind": "uniform", "uniform_ratio": alpha, "ray_scale": alpha, "ray": "uniform"})
        log.info("search %s: uniform baseline at α %.4f", self.search.name, alpha)

    def _next(self) -> float | None:
        """The next α (PENDING while a point is under way, None when complete)."""
        points = self.points()
        if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in points):
            return PENDING
        if not points:
            return self.high
        done = sorted((t for t in points if "tax" in t.user_attrs), key=lambda t: t.number)
        measured = {(t.user_attrs["uniform_ratio"], tax_of(t)) for t in done}
        alpha = None
        if measured and len(points) < self.limit:
            alpha = next_scale([1.0], measured, budget=self.budget, high=self.high)
            sides = [tax_of(t) <= self.budget for t in done[-2:]]
            if alpha is not None and len(sides) == 2 and sides[0] == sides[1]:
                # two steps from one side (a curved tax): halve the bracket instead
                lo = max([a for a, tax in measured if tax <= self.budget] + [0.0])
                hi = min((a for a, tax in measured if tax > self.budget and a > lo),
                         default=None)
                if hi is not None:
                    alpha = (lo + hi) / 2
        if alpha is None:
            feasible = any(a > 0 and tax <= self.budget for a, tax in measured)
            if not feasible and not any(t.user_attrs["uniform_ratio"] == 0.0 for t in points):
                return 0.0
            return None
        return round(alpha, 6)

    def complete(self) -> bool:
        """Every point measured and none more due."""
        return self._done or self._next() is None

    def step(self) -> float | None:
        """Enqueue the next uniform α when one is due; the α enqueued."""
        if self._done:
            return None
        alpha = self._next()
        if alpha is None:
            self._done = True
            return None
        if alpha == PENDING:
            return None
        self._add_point(alpha)
        return alpha
