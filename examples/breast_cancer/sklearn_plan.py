"""The scikit-learn plan of `train_sklearn.py`, in a module of its own: a plan's source is its
class plus its module's imports, so only these imports travel (and are reviewed) with it."""

from sklearn.linear_model import SGDClassifier

from meshfl.plans import SKLearnTrainingPlan


class SGDLogisticPlan(SKLearnTrainingPlan):
    """Logistic regression learnt by scikit-learn's SGD on each hospital's patients.

    The classes are declared so that every node's model has the same shape; the features come
    standardised by the federated preprocessing step (`preprocess=[Standardize()]`).
    """

    classes = (0, 1)

    def init_estimator(self, alpha: float = 1e-3):
        return SGDClassifier(loss="log_loss", alpha=alpha, learning_rate="constant", eta0=0.01)
