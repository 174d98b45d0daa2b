"""Property-based fuzzing of the served OpenAPI document with schemathesis.

Requests for every operation, valid by the schema and invalid by it, with a fixed seed and
a bounded number of examples. Checks: never a server error, and every response's status,
content type and body are ones the document declares; invalid requests are refused.
(Schemathesis's Hypothesis strategy is used directly: its pytest plugin does not run on pytest 9.2.)
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, negative_data_rejection, response_schema_conformance, status_code_conformance,
)

from .conftest import auth
from .live_server import wait_for_metric

pytest.importorskip("vllm")
pytestmark = pytest.mark.serial  # timing-sensitive: run alone (README's test command)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_the_server_does_what_its_openapi_document_says(server, mode):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/tokenize", "/detokenize", "/health"}

    @seed(20261129)
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(mode))
    def run(case) -> None:
        case.call_and_validate(headers=auth(), checks=CHECKS, timeout=120)

    run()
    assert wait_for_metric(server, "tablefree_engine_unfinished_requests", 0, within=2) == 0
