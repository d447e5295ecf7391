//! Read models and the projection runner (issue 4).
//!
//! A projection will be a named consumer that updates its tables in its service's
//! database in the same transaction as its inbox/checkpoint row, with the same `apply`
//! code serving live consumption and `orderflow replay`. Nothing is built here yet.
