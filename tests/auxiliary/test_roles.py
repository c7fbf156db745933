"""Roles of auxiliary-task methods: ``targets=[...]`` or ``main=...``, checked with clear errors."""

from dataclasses import dataclass

import pytest

import taskbalance as tb
from taskbalance.auxiliary.roles import resolve_roles, targets_from_specs
from taskbalance.data.tasks import Task
from taskbalance.errors import TaskError

TASKS = ("seg", "depth", "noise")


def test_main_and_targets_resolve_to_the_same_roles():
    by_main = resolve_roles(TASKS, main="depth")
    by_targets = resolve_roles(TASKS, targets=["depth"])
    assert by_main == by_targets
    assert by_main.targets == ("depth",)
    assert by_main.auxiliaries == ("seg", "noise")
    assert by_main.target_index == (1,)
    assert by_main.auxiliary_index == (0, 2)


def test_several_targets_are_kept_in_task_order():
    roles = resolve_roles(TASKS, targets=["noise", "seg"])
    assert roles.targets == ("seg", "noise")
    assert roles.auxiliaries == ("depth",)
    assert roles.is_target("noise") and not roles.is_target("depth")


def test_default_is_the_first_task():
    roles = resolve_roles(TASKS)
    assert roles.targets == ("seg",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ["seg"], "main": "seg"}, "not both"),
        ({"targets": "seg"}, "single string"),
        ({"targets": []}, "empty"),
        ({"targets": ["sge"]}, "unknown target"),
        ({"main": "sge"}, "unknown target"),
        ({"targets": ["seg", "seg"]}, "duplicate"),
        ({"main": ["seg"]}, "one task name"),
    ],
)
def test_bad_roles_raise_clear_errors(kwargs, message):
    with pytest.raises(TaskError, match=message):
        resolve_roles(TASKS, **kwargs)


def test_single_target_methods_refuse_several_targets():
    with pytest.raises(TaskError, match="single target"):
        resolve_roles(TASKS, targets=["seg", "depth"], single_target=True, method="hydalearn")


def test_targets_from_task_specifications():
    specs = [
        Task("y", "regression"),
        Task("helper", "regression", role="auxiliary"),
        Task("noise", "regression", role="auxiliary"),
    ]
    assert targets_from_specs(specs) == ["y"]

    @dataclass
    class Spec:
        name: str
        role: str

    with pytest.raises(TaskError, match="no task has role='target'"):
        targets_from_specs([Spec("a", "auxiliary")])


@pytest.mark.parametrize("method", ["gcs", "ol-aux"])
def test_auxiliary_balancers_take_roles_through_make(method):
    balancer = tb.make(method, list(TASKS), targets=["depth"])
    assert balancer.roles.targets == ("depth",)
    assert tb.make(method, list(TASKS), main="noise").roles.targets == ("noise",)
    with pytest.raises(TaskError, match="unknown target"):
        tb.make(method, list(TASKS), main="nope")
