import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The kernel tests are many small products: on 2 shared cores one intra-op thread is several times faster than
    two (the interpreter and the references alike). Every module here runs with one, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
