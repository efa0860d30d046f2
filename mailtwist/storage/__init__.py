"""Mail storage: Maildir++ compatible with Dovecot."""

from mailtwist.storage.maildir import (
    FLAG_LETTERS,
    LETTER_FLAGS,
    SPECIAL_FOLDERS,
    Folder,
    FolderNotFound,
    InvalidFolderName,
    LockError,
    Maildir,
    MessageInfo,
    validate_folder_name,
)

__all__ = [
    "FLAG_LETTERS",
    "LETTER_FLAGS",
    "SPECIAL_FOLDERS",
    "Folder",
    "FolderNotFound",
    "InvalidFolderName",
    "LockError",
    "Maildir",
    "MessageInfo",
    "validate_folder_name",
]
