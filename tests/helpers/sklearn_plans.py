"""scikit-learn plans used by the tests (own module: only these imports travel)."""

from sklearn.linear_model import Perceptron, SGDClassifier, SGDRegressor

from meshfl.plans import SKLearnTrainingPlan


class LogisticPlan(SKLearnTrainingPlan):
    classes = (0, 1)

    def init_estimator(self, alpha=1e-4):
        return SGDClassifier(loss="log_loss", alpha=alpha, learning_rate="constant", eta0=0.05)


class ThreeClassPerceptron(SKLearnTrainingPlan):
    classes = (0, 1, 2)

    def init_estimator(self):
        return Perceptron(eta0=0.1)


class LinearRegressionPlan(SKLearnTrainingPlan):
    task = "regression"

    def init_estimator(self):
        return SGDRegressor(learning_rate="constant", eta0=0.01)


class UndeclaredClassesPlan(SKLearnTrainingPlan):
    def init_estimator(self):
        return SGDClassifier()
