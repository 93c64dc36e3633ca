"""Fixtures of the serving tests."""
import pytest


@pytest.fixture(scope="session")
def cli_dir(model_folder):
    """A random nano model with a 64-token context, so a long prompt must be trimmed."""
    return model_folder(["hello there"], vocab_size=128, max_seq_len=64)


@pytest.fixture(scope="session")
def base_dir(model_folder):
    """cli_dir's model as a base model (trained on plain text, not chats)."""
    return model_folder(["hello there"], vocab_size=128, max_seq_len=64, chat=False)
