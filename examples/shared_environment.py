"""Several tasks, a sub-workflow and a launch plan sharing one environment: all run on the same fleet.

    pyflyte run examples/shared_environment.py wf --n 3
"""

from typing import List

from flytekit import LaunchPlan, workflow

from flytekitplugins.actor import ActorEnvironment

actor = ActorEnvironment(name="shared-actor", replica_count=2, ttl_seconds=60)


@actor.task
def make_numbers(n: int) -> List[int]:
    return list(range(1, n + 1))


@actor.task
def square_all(xs: List[int]) -> List[int]:
    return [x * x for x in xs]


@actor.task
def total(xs: List[int]) -> int:
    return sum(xs)


@workflow
def sum_of_squares(n: int) -> int:
    return total(xs=square_all(xs=make_numbers(n=n)))


sum_of_squares_lp = LaunchPlan.get_or_create(sum_of_squares, name="sum_of_squares_lp")


@workflow
def wf(n: int = 3) -> List[int]:
    from_subworkflow = sum_of_squares(n=n)
    from_launch_plan = sum_of_squares_lp(n=n)
    plain_sum = total(xs=make_numbers(n=n))
    return square_all(xs=[from_subworkflow, from_launch_plan, plain_sum])
