"""Golden cases (registered with @golden_case): filled per system."""
from tests.golden_utils import golden_case, summarize  # noqa: F401
