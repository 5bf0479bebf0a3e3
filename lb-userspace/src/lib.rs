//! The xlb agent as a library, so tests and xtask can drive its parts.
