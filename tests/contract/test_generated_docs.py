"""The generated docs (catalogue, OpenAPI) stay in sync with the contract."""

import json
from pathlib import Path

from pytest_rkv.docs import catalogue_markdown
from pytest_rkv.reference.server import openapi

DOCS = Path(__file__).resolve().parents[2] / "docs"


# -- generated docs stay in sync --------------------------------------------------------

def test_catalogue_doc_is_generated_from_the_contract():
    assert (DOCS / "catalogue.md").read_text() == catalogue_markdown() + "\n"


def test_openapi_doc_is_generated_from_the_models():
    assert json.loads((DOCS / "openapi.json").read_text()) == openapi()
