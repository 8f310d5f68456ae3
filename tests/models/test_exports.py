"""qatcore.models re-exports its models lazily: each name is the defining module's object."""

import importlib
import types

import pytest

import qatcore.models as models


@pytest.mark.parametrize("name", models.__all__)
def test_each_exported_name_is_its_object_not_a_module(name):
    value = getattr(models, name)
    # a function named like its file (cifar_resnet in cifar_resnet.py) would be shadowed by the module
    assert not isinstance(value, types.ModuleType), name
    assert name in dir(models)
    if isinstance(value, (type, types.FunctionType)):
        assert getattr(importlib.import_module(value.__module__), name) is value
