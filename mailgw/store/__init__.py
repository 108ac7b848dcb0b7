"""PostgreSQL storage: the pool, the migrations and one *Store per table group."""

from __future__ import annotations

from dataclasses import dataclass

from mailgw.store.accounts import AccountStore
from mailgw.store.auth_failures import AuthFailureStore
from mailgw.store.campaigns import CampaignStore
from mailgw.store.contacts import ContactStore
from mailgw.store.database import Database
from mailgw.store.dmds import DMDSStore
from mailgw.store.dmds_events import DMDSEventStore
from mailgw.store.events import EventStore
from mailgw.store.group_commit import GroupCommitter
from mailgw.store.inbound import InboundStore
from mailgw.store.keys import KeyStore
from mailgw.store.queue import QueueStore
from mailgw.store.queue_admin import QueueAdminStore
from mailgw.store.senders import SenderStore
from mailgw.store.statistics import StatisticsStore
from mailgw.store.submissions import SubmissionStore
from mailgw.store.suppressions import SuppressionStore
from mailgw.store.templates import TemplateStore
from mailgw.store.tracking import TrackingStore
from mailgw.store.webhook_queue import WebhookQueueStore
from mailgw.store.webhooks import WebhookStore

# Group-commit batches in flight at once: two, so that one batch is written while the
# previous one waits for its WAL flush. More make the batches smaller, so more statements
# and commits for the same work: under bench-smtp, 4 in flight cost 1.36 ms of CPU per
# message (twistd and PostgreSQL) and 2 cost 1.07 ms, for more messages per second.
GROUP_COMMIT_IN_FLIGHT = 2


@dataclass(frozen=True)
class Stores:
    """Every store over one Database; built once by the Gateway (or the CLI)."""

    database: Database
    # The group commit that the hot-path stores share.
    committer: GroupCommitter
    accounts: AccountStore
    senders: SenderStore
    contacts: ContactStore
    submissions: SubmissionStore
    templates: TemplateStore
    queue: QueueStore
    # Queue administration (O-7): the CLI's `mailgw queue` and the management API.
    queue_admin: QueueAdminStore
    events: EventStore
    keys: KeyStore
    auth_failures: AuthFailureStore
    tracking: TrackingStore
    statistics: StatisticsStore
    suppressions: SuppressionStore
    webhooks: WebhookStore
    # Events on their way to the webhook endpoints (W-2).
    webhook_queue: WebhookQueueStore
    # Bounces and complaints that come back by mail (D-7).
    inbound: InboundStore
    # DMDS campaigns and their keys, the contact book, the event log as DMDS reads it (H-2).
    campaigns: CampaignStore
    dmds: DMDSStore
    dmds_events: DMDSEventStore

    @classmethod
    def on(cls, database: Database) -> Stores:
        committer = GroupCommitter(database, max_in_flight=GROUP_COMMIT_IN_FLIGHT)
        contacts = ContactStore(committer)
        return cls(database=database, committer=committer, accounts=AccountStore(database),
                   senders=SenderStore(database), contacts=contacts,
                   submissions=SubmissionStore(database, contacts),
                   templates=TemplateStore(database), queue=QueueStore(database, committer),
                   queue_admin=QueueAdminStore(database),
                   events=EventStore(database, committer), keys=KeyStore(database),
                   auth_failures=AuthFailureStore(database),
                   suppressions=SuppressionStore(database), webhooks=WebhookStore(database),
                   webhook_queue=WebhookQueueStore(database, committer),
                   tracking=TrackingStore(database, committer),
                   statistics=StatisticsStore(database), inbound=InboundStore(database),
                   campaigns=CampaignStore(database), dmds=DMDSStore(database),
                   dmds_events=DMDSEventStore(database))
