//! Process managers (issue 5): the order-fulfilment saga, its persisted state,
//! deadlines and compensation.
//!
//! Its decisions will be pure (state + incoming event → new state + commands), apart
//! from a runner that loads, stores, and sends through the outbox in one transaction.
//! Nothing is built here yet.
