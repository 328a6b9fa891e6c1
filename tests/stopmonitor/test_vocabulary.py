"""The engine's StrEnums and the models' TextChoices hold the same values (one vocabulary)."""

import pytest

from stopmonitor import vocabulary


@pytest.mark.parametrize("name, enum", [
    pytest.param("OperationStatus", vocabulary.OperationStatus, id="operation"),
    pytest.param("ExecutionStatus", vocabulary.ExecutionStatus, id="execution"),
    pytest.param("BreakerStatus", vocabulary.BreakerPosition, id="breaker"),
])
def test_model_choices_equal_the_engine_enums(name, enum):
    from api import models

    assert sorted(getattr(models, name).values) == sorted(e.value for e in enum)
