"""The one error type of the data package."""


class DataError(ValueError):
    """A data file is missing, unreadable or does not fit the configuration.

    Messages name the file and the key (dataset or group path inside it) and say what to do, so a bad file is
    reported before training starts instead of as a crash in a DataLoader worker.
    """
