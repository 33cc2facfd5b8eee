"""fedsim.ray_jobs.run_bounded, the task pool the bench and a run's attack jobs share, with Ray's calls faked.

Expected values come from the fake itself: which refs were submitted, which one's ``get`` raises.
"""

from __future__ import annotations

import pytest
import ray

from fedsim.ray_jobs import run_bounded


class FakeRay:
    """Refs finish in submission order; ``get`` raises for the items named in ``dead``."""

    def __init__(self, dead: set[str]) -> None:
        self.dead, self.in_flight_peak, self.cancelled, self.live = dead, 0, [], []

    def submit(self, item: str) -> str:
        self.live.append(item)
        self.in_flight_peak = max(self.in_flight_peak, len(self.live))
        return item

    def wait(self, refs: list[str], num_returns: int) -> tuple[list[str], list[str]]:
        return refs[:1], refs[1:]

    def get(self, ref: str) -> str:
        self.live.remove(ref)
        if ref in self.dead:
            raise RuntimeError(f"worker of {ref} died")
        return ref.upper()

    def cancel(self, ref: str, force: bool) -> None:
        self.cancelled.append(ref)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    fake = FakeRay(dead={"b"})
    for name in ("wait", "get", "cancel"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    return fake


def test_every_item_finishes_in_order_with_its_result_or_its_error_and_the_bound_holds(fake: FakeRay) -> None:
    seen: list[tuple[str, str | None, str | None]] = []
    run_bounded(list("abcde"), fake.submit, 2, lambda item, result, error: seen.append(
        (item, result, None if error is None else str(error))))
    assert seen == [("a", "A", None), ("b", None, "worker of b died"), ("c", "C", None), ("d", "D", None),
                    ("e", "E", None)]
    assert fake.in_flight_peak == 2 and fake.cancelled == []


def test_an_exception_in_the_driver_cancels_what_is_in_flight(fake: FakeRay) -> None:
    def finish(item: str, result: str | None, error: BaseException | None) -> None:
        if item == "a":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bounded(list("abcd"), fake.submit, 3, finish)
    assert fake.cancelled == ["b", "c"]  # a had finished; d was never submitted
