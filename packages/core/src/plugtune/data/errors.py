"""The data package's error type (standard library only, so the registry and recipe validation
import it without loading ``datasets``)."""


class DataError(ValueError):
    """Bad input data: the message names the file, the line or record, and the field."""
