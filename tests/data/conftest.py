"""Fixtures for the data tests."""

from pathlib import Path

import pytest

# The corpora live beside the checkout: <checkout>/../shared/data.
SHARED_DATA = Path(__file__).parents[2].parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> Path:
  """The shared corpus directory; fails (not skips) when it is missing."""
  if not (SHARED_DATA / 'ptb').is_dir():
    pytest.fail(
        f'Shared corpora not found at {SHARED_DATA} (expected ../shared/data beside the '
        'checkout, with ptb/, sst/, dailydialog/ ...). Put the corpora there, or deselect these '
        'tests with -m "not shared_data".')
  return SHARED_DATA
