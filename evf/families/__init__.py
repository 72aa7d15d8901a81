"""The model families shipped with the library, one module each (see ``evf.registry``)."""
