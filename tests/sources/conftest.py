"""Fixtures of the real-data source tests (helpers live in ``sources_fixtures.py``).

Test modules here import ``sources_fixtures`` / ``sources_loopback`` by name: this directory is
put on ``sys.path`` so that works in any pytest import mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sources_fixtures import MolCatalog, serve_catalog, serve_earthengine


@pytest.fixture(scope="session")
def mol_catalog() -> MolCatalog:
    """The COGs and items (built once per test session, a second or so)."""
    return MolCatalog()


@pytest.fixture()
def stac_server(mol_catalog):
    """A fresh loopback STAC API over the Mol catalogue (faults off, nothing broken)."""
    mol_catalog.broken = set()
    mol_catalog.corrupt = set()
    mol_catalog.hidden_dates = set()
    mol_catalog.require_token = False
    srv = serve_catalog(mol_catalog)
    yield srv
    srv.close()


@pytest.fixture()
def ee_server(monkeypatch):
    """A loopback Earth Engine; the real ``ee`` client is reset before and after."""
    import ee

    # ee.Initialize also fetches a deprecated-assets list from the public data catalogue: keep
    # the test offline (and independent of it).
    monkeypatch.setattr(ee.deprecation, "_FetchDataCatalogStac", lambda: {})
    ee.Reset()
    srv = serve_earthengine()
    yield srv
    srv.close()
    ee.Reset()
    ee.data.setMaxRetries(5)
