"""The unsubscribe page's texts, in the message's language (T-3, S-9).

Language ids are those of X-Teenvio-Language, as in footer_texts.py; an id mailgw does
not know falls back to Spanish. `{email}` and `{domain}` are filled in by the page.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgw.content.footer_texts import DEFAULT_LANGUAGE


@dataclass(frozen=True)
class UnsubscribeTexts:
    lang: str  # the page's lang attribute (BCP 47)
    title: str
    # The recipient receives the domain's mail now.
    subscribed: str
    # The account's categories, as checkboxes.
    categories: str
    save: str
    # The button without categories, and beside them.
    unsubscribe: str
    unsubscribe_all: str
    reason: str
    # The recipient is unsubscribed from all of the domain's mail.
    unsubscribed: str
    resubscribe: str
    # What the last button did.
    saved: str
    resubscribed: str
    # The database is out of reach (503).
    unavailable: str


_TEXTS = {
    3: UnsubscribeTexts(
        "es", "Darse de baja", "{email} recibe correos de {domain}.",
        "Seguir recibiendo estas categorías:", "Guardar mis preferencias", "Darme de baja",
        "Darme de baja de todos los correos de {domain}", "¿Por qué? (opcional)",
        "{email} ya no recibe correos de {domain}.", "Volver a suscribirme",
        "Tus preferencias están guardadas.", "{email} vuelve a recibir correos de {domain}.",
        "Esta página no está disponible ahora. Inténtalo de nuevo en unos minutos."),
    4: UnsubscribeTexts(
        "en", "Unsubscribe", "{email} receives mail from {domain}.",
        "Keep receiving these categories:", "Save my choices", "Unsubscribe",
        "Unsubscribe from all mail from {domain}", "Why? (optional)",
        "{email} no longer receives mail from {domain}.", "Subscribe again",
        "Your choices are saved.", "{email} receives mail from {domain} again.",
        "This page is not available right now. Please try again in a few minutes."),
    5: UnsubscribeTexts(
        "it", "Annulla l'iscrizione", "{email} riceve email da {domain}.",
        "Continua a ricevere queste categorie:", "Salva le mie scelte",
        "Annulla l'iscrizione", "Annulla l'iscrizione a tutte le email di {domain}",
        "Perché? (facoltativo)", "{email} non riceve più email da {domain}.",
        "Iscriviti di nuovo", "Le tue scelte sono state salvate.",
        "{email} riceve di nuovo email da {domain}.",
        "Questa pagina non è disponibile ora. Riprova tra qualche minuto."),
    # French puts a (no-break) space before "?" and ":".
    6: UnsubscribeTexts(
        "fr", "Se désabonner", "{email} reçoit les e-mails de {domain}.",
        "Continuer à recevoir ces catégories\u00a0:", "Enregistrer mes choix",
        "Me désabonner", "Me désabonner de tous les e-mails de {domain}",
        "Pourquoi\u00a0? (facultatif)", "{email} ne reçoit plus les e-mails de {domain}.",
        "Me réabonner", "Vos choix sont enregistrés.",
        "{email} reçoit de nouveau les e-mails de {domain}.",
        "Cette page n'est pas disponible pour le moment. Réessayez dans quelques minutes."),
    7: UnsubscribeTexts(
        "de", "Abmelden", "{email} erhält E-Mails von {domain}.",
        "Diese Kategorien weiter erhalten:", "Meine Auswahl speichern", "Abmelden",
        "Von allen E-Mails von {domain} abmelden", "Warum? (optional)",
        "{email} erhält keine E-Mails mehr von {domain}.", "Wieder anmelden",
        "Ihre Auswahl ist gespeichert.", "{email} erhält wieder E-Mails von {domain}.",
        "Diese Seite ist gerade nicht verfügbar. Bitte versuchen Sie es in einigen Minuten "
        "erneut."),
    8: UnsubscribeTexts(
        "nl", "Afmelden", "{email} ontvangt e-mail van {domain}.",
        "Deze categorieën blijven ontvangen:", "Mijn keuzes opslaan", "Afmelden",
        "Afmelden voor alle e-mail van {domain}", "Waarom? (optioneel)",
        "{email} ontvangt geen e-mail meer van {domain}.", "Opnieuw aanmelden",
        "Je keuzes zijn opgeslagen.", "{email} ontvangt weer e-mail van {domain}.",
        "Deze pagina is nu niet beschikbaar. Probeer het over een paar minuten opnieuw."),
    11: UnsubscribeTexts(
        "pt", "Cancelar a subscrição", "{email} recebe e-mails de {domain}.",
        "Continuar a receber estas categorias:", "Guardar as minhas escolhas",
        "Cancelar a subscrição", "Cancelar a subscrição de todos os e-mails de {domain}",
        "Porquê? (opcional)", "{email} já não recebe e-mails de {domain}.",
        "Subscrever de novo", "As suas escolhas foram guardadas.",
        "{email} volta a receber e-mails de {domain}.",
        "Esta página não está disponível agora. Tente de novo dentro de alguns minutos."),
    13: UnsubscribeTexts(
        "no", "Meld deg av", "{email} mottar e-post fra {domain}.",
        "Fortsett å motta disse kategoriene:", "Lagre valgene mine", "Meld meg av",
        "Meld meg av all e-post fra {domain}", "Hvorfor? (valgfritt)",
        "{email} mottar ikke lenger e-post fra {domain}.", "Meld meg på igjen",
        "Valgene dine er lagret.", "{email} mottar e-post fra {domain} igjen.",
        "Denne siden er ikke tilgjengelig akkurat nå. Prøv igjen om noen minutter."),
    14: UnsubscribeTexts(
        "sv", "Avregistrera", "{email} får e-post från {domain}.",
        "Fortsätt att få de här kategorierna:", "Spara mina val", "Avregistrera mig",
        "Avregistrera mig från all e-post från {domain}", "Varför? (valfritt)",
        "{email} får inte längre e-post från {domain}.", "Registrera mig igen",
        "Dina val är sparade.", "{email} får e-post från {domain} igen.",
        "Sidan är inte tillgänglig just nu. Försök igen om några minuter."),
    15: UnsubscribeTexts(
        "ca", "Donar-se de baixa", "{email} rep correus de {domain}.",
        "Continuar rebent aquestes categories:", "Desar les meves preferències",
        "Donar-me de baixa", "Donar-me de baixa de tots els correus de {domain}",
        "Per què? (opcional)", "{email} ja no rep correus de {domain}.",
        "Tornar a subscriure'm", "Les teves preferències s'han desat.",
        "{email} torna a rebre correus de {domain}.",
        "Aquesta pàgina no està disponible ara. Torna-ho a provar d'aquí a uns minuts."),
    16: UnsubscribeTexts(
        "fi", "Peru tilaus", "{email} saa postia osoitteesta {domain}.",
        "Saan edelleen nämä luokat:", "Tallenna valintani", "Peru tilaus",
        "Peru kaikki viestit osoitteesta {domain}", "Miksi? (valinnainen)",
        "{email} ei enää saa postia osoitteesta {domain}.", "Tilaa uudelleen",
        "Valintasi on tallennettu.", "{email} saa taas postia osoitteesta {domain}.",
        "Sivu ei ole nyt käytettävissä. Yritä uudelleen muutaman minuutin kuluttua."),
    17: UnsubscribeTexts(
        "gl", "Darse de baixa", "{email} recibe correos de {domain}.",
        "Seguir recibindo estas categorías:", "Gardar as miñas preferencias",
        "Darme de baixa", "Darme de baixa de todos os correos de {domain}",
        "Por que? (opcional)", "{email} xa non recibe correos de {domain}.",
        "Volver subscribirme", "As túas preferencias están gardadas.",
        "{email} volve recibir correos de {domain}.",
        "Esta páxina non está dispoñible agora. Téntao de novo nuns minutos."),
    18: UnsubscribeTexts(
        "eu", "Harpidetza kendu", "{email} helbideak {domain} domeinuaren mezuak jasotzen "
        "ditu.", "Kategoria hauek jasotzen jarraitu:", "Gorde nire aukerak",
        "Harpidetza kendu", "{domain} domeinuaren mezu guztien harpidetza kendu",
        "Zergatik? (aukerakoa)", "{email} helbideak ez ditu jada {domain} domeinuaren "
        "mezuak jasotzen.", "Berriro harpidetu", "Zure aukerak gorde dira.",
        "{email} helbideak berriro jasotzen ditu {domain} domeinuaren mezuak.",
        "Orri hau ez dago erabilgarri orain. Saiatu berriro minutu batzuk barru."),
}


def unsubscribe_texts(language: int) -> UnsubscribeTexts:
    """The texts for an S-9 language id; Spanish for an id mailgw does not know."""
    return _TEXTS.get(language) or _TEXTS[DEFAULT_LANGUAGE]
