"""The HTTP/JSON API against its own OpenAPI document (generated from the proto), with schemathesis: requests
generated from the document, valid and not, reach the real gateway; no answer is a server error, and every answer
conforms to the document (status declared, content type, JSON schema). This checks the document as much as the
service: a wrong schema fails here. (A schema-valid request may still be refused: the document cannot say that the
bytes must be an image, or that a Segment needs a prompt.)"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fuzz.harness import FuzzTarget

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="session")
def http_schema(fuzz_target: FuzzTarget) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_target.gateway.http_url}/openapi.json")


def test_the_http_api_keeps_to_its_openapi_document(http_schema) -> None:
    operations = [result.ok() for result in http_schema.get_all_operations()]
    assert len(operations) >= 9  # every route of every RPC
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def keeps_to_the_document(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=30)

        keeps_to_the_document()
