"""What tests use beyond the gpu marker: instances of their own, deployed servers."""
