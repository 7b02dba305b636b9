"""``POST /segment``'s fields have one definition: the form and the JSON body are validated by the
same model (a form's strings leniently, JSON values strictly), and both OpenAPI bodies come from it."""

from __future__ import annotations

import pytest

from fprotoseg.app.errors import Problem
from fprotoseg.app.routes.segment_models import (
    MAX_METADATA_BYTES,
    SEGMENT_REQUEST_BODY,
    SegmentFields,
    SegmentReference,
)
from fprotoseg.worker.error_codes import ErrorCode


def test_a_form_is_strings_parsed_to_the_fields() -> None:
    fields = SegmentFields.from_form(
        {"mpp": "0.5", "metadata": '{"n": 1}', "external_id": "C-1", "model": "", "other": "ignored"}
    )
    assert fields.mpp == 0.5 and fields.model is None
    assert fields.client_metadata() == {"n": 1, "external_id": "C-1"}


def test_a_json_body_keeps_its_types() -> None:
    ref = SegmentReference.from_json({"slide_uri": "s3://b/k", "mpp": 1, "metadata": {"n": 1}})
    assert ref.mpp == 1.0 and ref.metadata == {"n": 1}
    for field, bad in (("mpp", "0.5"), ("metadata", '{"n": 1}'), ("bogus", 1)):
        with pytest.raises(Problem) as info:
            SegmentReference.from_json({"slide_uri": "s3://b/k", field: bad})
        assert info.value.code == ErrorCode.INVALID_REQUEST and field in info.value.detail


@pytest.mark.parametrize(
    "form",
    [{"mpp": "nan"}, {"mpp": "200"}, {"metadata": "[1]"}, {"metadata": "x" * (MAX_METADATA_BYTES + 1)},
     {"external_id": "e" * 201}],
)
def test_bad_form_fields_are_invalid_requests(form: dict[str, str]) -> None:
    with pytest.raises(Problem) as info:
        SegmentFields.from_form(form)
    assert info.value.http_status == 422 and info.value.code == ErrorCode.INVALID_REQUEST


def test_both_request_bodies_document_every_field() -> None:
    content = SEGMENT_REQUEST_BODY["requestBody"]["content"]
    names = set(SegmentFields.model_fields)
    assert set(content["multipart/form-data"]["schema"]["properties"]) == names | {"file"}
    assert set(content["application/json"]["schema"]["properties"]) == names | {"slide_uri"}
