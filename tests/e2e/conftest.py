"""The served cluster most OpenAI end-to-end modules share the shape of: `p3 serve` on the
default model, one per module (a module that needs another defines its own `url`)."""

from __future__ import annotations

import openai
import pytest

from tests.e2e import openai_cluster


@pytest.fixture(scope="module")
def url(default_model_dir):
    cluster = openai_cluster.start()
    yield cluster.url
    cluster.stop()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=90, max_retries=0)
