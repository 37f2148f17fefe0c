//! chatkit-gate library (skeleton).
