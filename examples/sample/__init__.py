"""The sample manifest and its images, installed as the package ``evf.sample`` (see pyproject.toml)."""
