//! The payment service: one entity per order's payment.
//!
//! It reacts to the order's integration events (`PaymentRequested`, `PaymentCancelRequested`)
//! and answers with `PaymentSettled` through its own outbox. The provider call runs in a task
//! spawned by the entity (so a cancel can be taken while a charge hangs), with retries,
//! exponential backoff with jitter, a per-call timeout, a circuit breaker shared by all
//! payments, and the payment deadline persisted in the log (so it holds after a restart). The
//! order id is the provider's idempotency key, so a charge retried after a crash is not a
//! second charge.

use super::events::{IntegrationEvent, PaymentOutcome, event_id};
use super::remote::{PaymentRequest, Placement, call, locate};
use super::{Settings, now_ms};
use crate::domain::{Money, OrderId, Payment, PaymentCommand, PaymentEvent, PaymentStep, PaymentToken, UnixMillis};
use crate::error::ServiceError;
use crate::provider::{ChargeDecision, ChargeRequest, PaymentProvider, RefundRequest};
use metrics::Counter;
use ordermesh_runtime::{CircuitBreaker, Entity, EntityContext, Mailbox, RouterHandle};
use ordermesh_storage::{Append, Store, WriteBatch, codec};
use ractor::{ActorProcessingErr, RpcReplyPort};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

pub enum PaymentMsg {
    /// From the order's outbox: charge this order.
    Request {
        event_id: String,
        amount: Money,
        token: PaymentToken,
        deadline_at: UnixMillis,
        reply: RpcReplyPort<Result<(), ServiceError>>,
    },
    /// From the order's outbox: the order is cancelled; void or refund.
    Cancel {
        event_id: String,
        reply: RpcReplyPort<Result<(), ServiceError>>,
    },
    /// The charge task's final answer.
    ChargeFinished(ChargeResult),
    /// The refund task's answer: the provider's refund id.
    RefundFinished {
        refund_id: String,
    },
    /// Start whatever is pending (sent by recovery at start).
    Resume,
    Get {
        reply: RpcReplyPort<Option<Payment>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeResult {
    Captured { charge_id: String },
    Declined { reason: String },
    Failed { reason: String },
}

impl ChargeResult {
    fn into_command(self) -> PaymentCommand {
        match self {
            ChargeResult::Captured { charge_id } => PaymentCommand::RecordCaptured { charge_id },
            ChargeResult::Declined { reason } => PaymentCommand::RecordDeclined { reason },
            ChargeResult::Failed { reason } => PaymentCommand::RecordFailed { reason },
        }
    }
}

#[derive(Clone)]
pub struct PaymentDeps {
    pub store: Store,
    pub provider: Arc<dyn PaymentProvider>,
    pub breaker: Arc<CircuitBreaker>,
    pub settings: Arc<Settings>,
    pub settled: Arc<SettledCounters>,
}

/// `payments_settled_total` by outcome, registered once when the service starts (a macro call
/// looks its metric up in the recorder's registry every time).
pub struct SettledCounters {
    captured: Counter,
    declined: Counter,
    failed: Counter,
}

impl SettledCounters {
    pub fn register() -> SettledCounters {
        let outcome = |label: &'static str| metrics::counter!("payments_settled_total", "outcome" => label);
        SettledCounters { captured: outcome("captured"), declined: outcome("declined"), failed: outcome("failed") }
    }
}

pub struct PaymentEntity {
    order: OrderId,
    payment: Option<Payment>,
    /// The provider call in flight (a charge or a refund).
    task: Option<JoinHandle<()>>,
}

impl Drop for PaymentEntity {
    fn drop(&mut self) {
        // A charge task outliving its actor is harmless (the provider dedups on the order id
        // and the next activation retries), but it would only waste a provider call.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Entity for PaymentEntity {
    type Msg = PaymentMsg;
    type Deps = PaymentDeps;

    async fn activate(key: &str, deps: &PaymentDeps) -> Result<Self, ActorProcessingErr> {
        let order = OrderId::parse(key)?;
        let mut payment = None;
        for stored in deps.store.read_events(key, 0)? {
            payment = Payment::apply(payment, &codec::decode::<PaymentEvent>(&stored.bytes)?);
        }
        Ok(Self { order, payment, task: None })
    }

    fn on_activated(&mut self, ctx: &EntityContext<Self>) {
        self.start_pending_work(ctx);
    }

    fn can_passivate(&self) -> bool {
        self.task.is_none()
    }

    fn finished(&self) -> bool {
        self.task.is_none() && self.payment.as_ref().is_none_or(|p| p.next_step() == PaymentStep::Done)
    }

    async fn handle(&mut self, msg: PaymentMsg, ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        let deps = ctx.deps();
        match msg {
            PaymentMsg::Request { event_id, amount, token, deadline_at, reply } => {
                let result = self.request(ctx, &event_id, amount, token, deadline_at).await;
                let _ = reply.send(result);
                self.start_pending_work(ctx);
            }
            PaymentMsg::Cancel { event_id, reply } => {
                tracing::trace!(order = %self.order, %event_id, "payment cancel requested");
                let result = self.execute(deps, &[PaymentCommand::Cancel { order: self.order }]).await;
                let _ = reply.send(result);
                self.start_pending_work(ctx);
            }
            PaymentMsg::ChargeFinished(result) => {
                self.task = None;
                self.execute(deps, &[result.into_command()]).await?;
                self.start_pending_work(ctx);
            }
            PaymentMsg::RefundFinished { refund_id } => {
                self.task = None;
                self.execute(deps, &[PaymentCommand::RecordRefunded { refund_id }]).await?;
                metrics::counter!("payments_refunded_total").increment(1);
            }
            PaymentMsg::Resume => self.start_pending_work(ctx),
            PaymentMsg::Get { reply } => {
                let _ = reply.send(self.payment.clone());
            }
        }
        Ok(())
    }
}

impl PaymentEntity {
    /// Takes the order's payment request. A redelivered request finds the payment and changes
    /// nothing (`Payment::decide` answers a repeated command with no events), so no inbox is
    /// needed; the same holds for a repeated cancel.
    ///
    /// A new payment is charged right away while the relay waits: when the provider decides
    /// within `payment_inline_wait`, the request and its outcome are committed together (one
    /// commit, no task, no message; the common case). Otherwise the request is committed alone
    /// and the same charge, still running, goes on in a task that reports by message. Charging
    /// before the request is durable is safe: the order id is the provider's idempotency key,
    /// so after a crash the redelivered request gets the same charge back, not a second one.
    async fn request(
        &mut self,
        ctx: &EntityContext<Self>,
        event_id: &str,
        amount: Money,
        token: PaymentToken,
        deadline_at: UnixMillis,
    ) -> Result<(), ServiceError> {
        let deps = ctx.deps();
        let charge = ChargeRequest { idempotency_key: self.order.to_string(), amount, token: token.clone() };
        let command = PaymentCommand::Request { order: self.order, amount, token, deadline_at };
        if self.payment.is_some() {
            tracing::debug!(order = %self.order, %event_id, "payment request redelivered");
            return self.execute(deps, &[command]).await;
        }
        let mut charge = Box::pin(charge_until_deadline(deps.clone(), charge, deadline_at));
        match tokio::time::timeout(deps.settings.payment_inline_wait, charge.as_mut()).await {
            Ok(result) => self.execute(deps, &[command, result.into_command()]).await,
            Err(_still_charging) => {
                self.execute(deps, &[command]).await?;
                let mailbox = ctx.mailbox();
                self.task = Some(tokio::spawn(async move { mailbox.send(PaymentMsg::ChargeFinished(charge.await)) }));
                Ok(())
            }
        }
    }

    /// Decides `commands` one after the other, persists their events in one commit (with the
    /// settlement event for the order when the charge is final) and applies them.
    async fn execute(&mut self, deps: &PaymentDeps, commands: &[PaymentCommand]) -> Result<(), ServiceError> {
        let mut events = Vec::new();
        let mut after = self.payment.clone();
        for command in commands {
            let decided = Payment::decide(after.as_ref(), command).map_err(|r| ServiceError::Invalid(r.to_string()))?;
            after = decided.iter().fold(after, Payment::apply);
            events.extend(decided);
        }
        if events.is_empty() {
            return Ok(());
        }
        let before_version = self.payment.as_ref().map_or(0, |p| p.version);
        let mut batch = WriteBatch {
            appends: vec![Append {
                entity: self.order.to_string(),
                expected_version: before_version,
                events: events.iter().map(codec::encode).collect::<Result<_, _>>()?,
            }],
            ..WriteBatch::default()
        };
        for (i, event) in events.iter().enumerate() {
            let (outcome, counter) = match event {
                PaymentEvent::Captured { .. } => (PaymentOutcome::Captured, &deps.settled.captured),
                PaymentEvent::Declined { .. } => (PaymentOutcome::Declined, &deps.settled.declined),
                PaymentEvent::Failed { .. } => (PaymentOutcome::Failed, &deps.settled.failed),
                _ => continue,
            };
            counter.increment(1);
            // A cancelled order is not waiting for the verdict; the refund follows instead.
            if after.as_ref().is_some_and(|p| !p.cancel_requested) {
                let seq = before_version + i as u64 + 1;
                let settled = IntegrationEvent::PaymentSettled {
                    event_id: event_id(self.order, "payment", seq),
                    order: self.order,
                    outcome,
                };
                batch.outbox.push(codec::encode(&settled)?);
            }
        }
        let active_key = [b"r/".as_slice(), self.order.to_string().as_bytes()].concat();
        let running = |p: &Option<Payment>| p.as_ref().is_some_and(|p| p.next_step() != PaymentStep::Done);
        match (running(&self.payment), running(&after)) {
            (false, true) => batch.index_put.push((active_key, vec![])),
            (true, false) => batch.index_delete.push(active_key),
            _ => {}
        }
        deps.store.commit(batch).await?;
        self.payment = after;
        Ok(())
    }

    fn start_pending_work(&mut self, ctx: &EntityContext<Self>) {
        if self.task.is_some() {
            return;
        }
        let Some(payment) = &self.payment else { return };
        let deps = ctx.deps().clone();
        let mailbox = ctx.mailbox();
        self.task = match payment.next_step() {
            PaymentStep::Done => None,
            PaymentStep::Charge { deadline_at } => {
                let Some(token) = payment.token.clone() else { return };
                let request = ChargeRequest { idempotency_key: self.order.to_string(), amount: payment.amount, token };
                Some(tokio::spawn(async move {
                    mailbox.send(PaymentMsg::ChargeFinished(charge_until_deadline(deps, request, deadline_at).await));
                }))
            }
            PaymentStep::Refund => {
                let Some(charge_id) = payment.charge_id.clone() else { return };
                let request =
                    RefundRequest { idempotency_key: self.order.to_string(), charge_id, amount: payment.amount };
                Some(tokio::spawn(refund_until_done(deps, request, mailbox)))
            }
        };
    }
}

/// Charges with retries until the provider decides or the deadline passes.
async fn charge_until_deadline(deps: PaymentDeps, request: ChargeRequest, deadline_at: UnixMillis) -> ChargeResult {
    let settings = &deps.settings;
    let mut attempt = 0u32;
    loop {
        let remaining = Duration::from_millis(deadline_at.saturating_sub(now_ms()));
        if remaining.is_zero() {
            break ChargeResult::Failed { reason: format!("payment deadline passed after {attempt} attempts") };
        }
        if let Some(admitted) = deps.breaker.admit() {
            let call = deps.provider.charge(request.clone());
            match tokio::time::timeout(settings.payment_call_timeout.min(remaining), call).await {
                Ok(Ok(ChargeDecision::Approved { charge_id })) => {
                    deps.breaker.success(admitted);
                    break ChargeResult::Captured { charge_id };
                }
                Ok(Ok(ChargeDecision::Declined { reason })) => {
                    deps.breaker.success(admitted);
                    break ChargeResult::Declined { reason };
                }
                Ok(Err(err)) => {
                    deps.breaker.failure(admitted);
                    tracing::debug!(order = request.idempotency_key, attempt, error = %err, "charge failed, will retry");
                }
                Err(_elapsed) => {
                    deps.breaker.failure(admitted);
                    tracing::debug!(order = request.idempotency_key, attempt, "charge timed out, will retry");
                }
            }
        }
        metrics::counter!("payment_retries_total").increment(1);
        let remaining = Duration::from_millis(deadline_at.saturating_sub(now_ms()));
        tokio::time::sleep(settings.payment_backoff.delay(attempt).min(remaining)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Refunds with retries until the provider confirms (a refund owed is never dropped).
async fn refund_until_done(deps: PaymentDeps, request: RefundRequest, mailbox: Mailbox<PaymentMsg>) {
    let mut attempt = 0u32;
    loop {
        if let Some(admitted) = deps.breaker.admit() {
            let call = deps.provider.refund(request.clone());
            match tokio::time::timeout(deps.settings.payment_call_timeout, call).await {
                Ok(Ok(refund_id)) => {
                    deps.breaker.success(admitted);
                    mailbox.send(PaymentMsg::RefundFinished { refund_id });
                    return;
                }
                _ => deps.breaker.failure(admitted),
            }
        }
        metrics::counter!("payment_retries_total").increment(1);
        tokio::time::sleep(deps.settings.payment_backoff.delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Typed handle to the payment service. In a cluster, events go to the node owning the
/// order's payment.
#[derive(Clone)]
pub struct PaymentService {
    /// This node's router and store (`None` on a node that does not host payments).
    local: Option<(RouterHandle<PaymentMsg>, Store)>,
    settings: Arc<Settings>,
    placement: Placement,
}

impl PaymentService {
    pub(crate) fn new(
        local: Option<(RouterHandle<PaymentMsg>, Store)>,
        settings: Arc<Settings>,
        placement: Placement,
    ) -> Self {
        Self { local, settings, placement }
    }

    fn local(&self) -> Result<&(RouterHandle<PaymentMsg>, Store), ServiceError> {
        self.local
            .as_ref()
            .ok_or(ServiceError::Unavailable { service: "payment", detail: "this node does not host payments".into() })
    }

    /// The payment of an order, as this node's log says (payments this node owns).
    pub fn get(&self, order: OrderId) -> Result<Option<Payment>, ServiceError> {
        let (_, store) = self.local()?;
        let mut payment = None;
        for stored in store.read_events(&order.to_string(), 0)? {
            payment = Payment::apply(payment, &codec::decode::<PaymentEvent>(&stored.bytes)?);
        }
        Ok(payment)
    }

    /// Delivers one of the order service's events (used by the order outbox relay) to the
    /// node owning the order's payment.
    pub(crate) async fn deliver(&self, event: IntegrationEvent) -> Result<(), ServiceError> {
        let order = match &event {
            IntegrationEvent::PaymentRequested { order, .. }
            | IntegrationEvent::PaymentCancelRequested { order, .. } => *order,
            IntegrationEvent::PaymentSettled { .. } => {
                return Err(ServiceError::Invalid("payment settlements go to the order service".into()));
            }
        };
        match locate(&self.placement, "payment", &order.to_string())? {
            None => self.deliver_local(event).await,
            Some(remote) => call(&remote, "payment", &PaymentRequest::Deliver(event), self.settings.call_timeout).await,
        }
    }

    pub(crate) async fn deliver_local(&self, event: IntegrationEvent) -> Result<(), ServiceError> {
        let timeout = self.settings.call_timeout;
        let (router, _) = self.local()?;
        match event {
            IntegrationEvent::PaymentRequested { event_id, order, amount, token, deadline_at } => {
                let build = |reply| PaymentMsg::Request { event_id, amount, token, deadline_at, reply };
                router.call(&order.to_string(), build, timeout).await?
            }
            IntegrationEvent::PaymentCancelRequested { event_id, order } => {
                router.call(&order.to_string(), |reply| PaymentMsg::Cancel { event_id, reply }, timeout).await?
            }
            IntegrationEvent::PaymentSettled { .. } => {
                Err(ServiceError::Invalid("payment settlements go to the order service".into()))
            }
        }
    }

    /// Orders whose payment has work pending on this node (resumed at start).
    pub(crate) fn running(&self) -> Result<Vec<OrderId>, ServiceError> {
        let Some((_, store)) = &self.local else { return Ok(vec![]) };
        let mut ids = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = store.index_scan(b"r/", after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            ids.extend(page.iter().filter_map(|(k, _)| OrderId::parse(std::str::from_utf8(&k[2..]).ok()?).ok()));
        }
        Ok(ids)
    }

    pub(crate) fn resume(&self, order: OrderId) {
        if let Some((router, _)) = &self.local {
            let _ = router.send(&order.to_string(), PaymentMsg::Resume);
        }
    }

    pub(crate) fn stop(&self) {
        if let Some((router, _)) = &self.local {
            router.stop();
        }
    }
}
